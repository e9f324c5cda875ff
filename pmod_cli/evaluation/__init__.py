"""Evaluation through lmms-eval: the ``pmod`` model, pmod's tasks, and ``pmod eval``'s report.

- ``lmms_model.PMoDLmms``: the lmms-eval model over any p-MoD or dense LLaVA checkpoint
  (entry point ``pmod`` in the group ``lmms_eval.models``, see ``registration``);
- ``measure``: what is measured per request (latencies, KV cache after prefill, peak memory);
- ``tasks``: ``pmod_tiny_vqa`` / ``pmod_tiny_vqa_mc`` (offline) and the ``pmod_paper14`` group;
- ``run.evaluate_checkpoints``: ``simple_evaluate`` per checkpoint, then the efficiency summary;
- ``report.report_table``: the rich table of ``pmod eval``.
"""
