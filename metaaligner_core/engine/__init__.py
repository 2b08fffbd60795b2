"""The local decoding engine: :class:`~metaaligner_core.engine.generator.LocalGenerator` and its parts
(:mod:`.cache`, :mod:`.attention`, :mod:`.sampling`), and the server's iteration-level scheduler
(:class:`~metaaligner_core.engine.scheduler.StepScheduler`)."""
