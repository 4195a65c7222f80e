"""Text generation from the three forms of a tuned model: unmerged (base + bypass), merged, ONNX.

``decode.py`` is the loop (greedy or sampled, stop at EOS per sequence) over a *session*, an object
that turns prompts into next-token logits and then takes one token per step. ``sessions.py`` holds
the sessions: a transformers model with its KV cache, the ONNX ``model_with_past.onnx`` fed its own
``present.*`` outputs back as ``past_key_values.*``, and a full re-run of a logits-only model
(``model.onnx``) every step. ``sources.py`` opens the three forms (loaded through ``forms/``) and
refuses what cannot generate; ``prompts.py`` reads prompt files and turns ids into text; ``run.py``
ties them together for the CLI.
``check/generation.py`` compares greedy tokens across the three forms (``check --generate N``).
"""
