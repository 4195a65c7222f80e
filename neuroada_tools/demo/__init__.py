"""``neuroada-tools demo``: the whole pipeline on a real pretrained model, as a user would run it.

``llm.py`` (the default): SmolLM2-135M-Instruct learns facts about a fictional archipelago; the
held-out questions are answered by the base and by the tuned model through ONNX Runtime.
``classifier.py`` (``--model minilm``): all-MiniLM-L6-v2 learns a generated sentiment set.
Both raise the project's typed errors and report progress through a ``say`` callback; the CLI
(``cli/demo.py``) prints.
"""
