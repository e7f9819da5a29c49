"""kvcore inside serving engines (docs/serving.md).

:mod:`kvcore.serving.hf` puts kvcore's block allocator and per-request compression under
transformers' continuous-batching engine (``model.generate_batch``,
``model.init_continuous_batching``). Import it explicitly: it checks the installed
transformers version at import.
"""
