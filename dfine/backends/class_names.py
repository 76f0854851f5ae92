"""Class names for a backend: given ones, else COCO for 80 classes, else ``class_<i>``."""

from __future__ import annotations

from collections.abc import Sequence


def resolve_class_names(num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """The names a backend reports, index = label.

    Args:
        num_classes: how many classes the model scores.
        class_names: names the user or the model file gives; must have ``num_classes`` entries.

    Returns:
        ``class_names`` as a list; otherwise the 80 COCO names when ``num_classes == 80``;
        otherwise ``["class_0", "class_1", ...]``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if class_names is not None:
        names = [str(n) for n in class_names]
        if len(names) != num_classes:
            raise ValueError(
                f"class_names has {len(names)} entries but the model has {num_classes} classes; "
                "give one name per class"
            )
        return names
    if num_classes == 80:
        # Imported here so that a backend module imports without the network package loaded.
        from dfine.classes import COCO_CLASSES

        return list(COCO_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]
