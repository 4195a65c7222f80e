"""Task scoring of any form of a tuned model over a data file with references (``neuroada-tools evaluate``).

``records.py`` turns data records into items (rendered prompt, reference, options) through a
registry of record kinds; ``answers.py`` holds the answer-extraction rules of the authors'
evaluation, SQuAD's normalisation for free-form references and the Wilson interval; ``scoring.py``
the three scorings (greedy generation, option log-likelihood, classifier argmax); ``run.py`` ties
them together for the CLI. Models are opened through ``forms/``; decoding is ``generate/``'s.
"""
