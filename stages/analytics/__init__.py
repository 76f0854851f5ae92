"""Camera analytics: counting lines, zones with dwell and loitering, optional ground speed.

``config`` (the ``analytics`` config section), ``geometry`` (vectorised tests), ``lines``,
``zones``, ``speed`` (the per-stream state), ``stage`` (the pipeline stage), ``overlay``
(what the annotated video draws).
"""
