"""Read training data, tokenize it and mask prompts for ``train-sparse``.

Which file holds what: ``records.py`` (reading files, 1), ``prompts.py`` (formats, fields and the
prompt template, 2), ``chat.py`` (conversations and the chat template; prompts for evaluation, 2),
``examples.py`` (causal-LM examples, tokenizer helpers, 3), ``labels.py``
(classification), ``choices.py`` (multiple choice), ``collate.py`` (4), ``demo.py`` (the demo's
generated sentiment set).

What this package does
----------------------
1. :func:`read_records` reads a data file into a list of JSON objects. Two layouts are accepted:
   a JSON file holding one list of objects (the LLM-Adapters layout, e.g. ``boolq/train.json``),
   or JSONL (one object per line, blank lines ignored). The layout is chosen by the first
   non-blank character of the file: ``[`` means a JSON list, anything else JSONL. Every record
   remembers where it came from (``line 7`` for JSONL, ``record 3 (line 12)`` for a JSON list),
   so every later error names the file and the line.
2. Five record formats, detected from the fields of the first record (:func:`detect_format`)
   or forced with ``fmt=`` (TRL's dataset formats are the reference for the last two):

   - ``instruction``: ``instruction`` (str), ``output`` (str), optional ``input`` (str, default
     ``""``), optional ``answer`` (ignored by the causal-LM builder, a label for classification);
   - ``text``: ``{"text": ...}``, trained on every token;
   - ``classification``: a text field (default ``text``) and a label field (default ``label``);
   - ``conversational``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str},
     ...]}``, rendered with the tokenizer's chat template, trained on every assistant turn;
   - ``prompt-completion``: ``{"prompt": ..., "completion": ...}``, both strings (rendered like
     instruction records with the prompt as it is) or both message lists (rendered with the chat
     template, trained on the completion).

   Instruction records use the Alpaca template below unless ``template="chat"`` (a user turn and
   an assistant turn, rendered with the chat template). :func:`render_prompts` gives the prompt
   ids and the reference answer of each record exactly as training renders them, for evaluation.
3. Builders turn records into token-id examples. Each one validates *every* record before it
   tokenizes anything, so bad data fails before training starts, never in the middle of it:

   - :func:`build_causal_lm_examples` -> ``input_ids``, ``attention_mask``, ``labels``;
   - :func:`build_classification_examples` -> ``input_ids``, ``attention_mask``,
     (``token_type_ids``), ``label``, plus the label names in id order;
   - :func:`build_multiple_choice_examples` -> one (question, option) encoding per option and
     the index of the right one (ARC-Easy with an encoder).
4. :func:`collate` right-pads a list of examples into tensors.

The prompt template (LLM-Adapters / Alpaca)
-------------------------------------------
With a non-empty ``input``::

    Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:

and with an empty or missing ``input``::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Response:

Each prompt ends with ``"### Response:\\n"``; the ``output`` follows it directly and the tokenizer's
eos token follows the output. (LLM-Adapters' ``finetune.py`` has stray indentation and trailing
spaces inside its f-strings; ``prompts.py`` uses the clean Alpaca text, as the constants
:data:`PROMPT_TEMPLATE` and :data:`PROMPT_TEMPLATE_NO_INPUT` spell it out.)

Tokenization and masking
------------------------
A causal-LM example is ``prefix + ids(prompt) + ids(output) + [eos]``, where ``prefix`` is what
the tokenizer puts before a text on its own (``<s>`` for Llama, nothing for GPT-2) and the prompt
and output are tokenized separately, without special tokens. The prompt therefore has exactly the
tokens it has at generation time, when it is tokenized alone, and the mask boundary is exact:
``labels`` is ``-100`` on ``prefix + ids(prompt)`` (unless ``train_on_prompt``) and equals
``input_ids`` elsewhere. Worked example (GPT-2-like tokenizer, no prefix, eos id 2)::

    prompt ids [11, 12, 13], output ids [21, 22], max_length 16
    input_ids = [11, 12, 13, 21, 22, 2]
    labels    = [-100, -100, -100, 21, 22, 2]

Too-long examples are cut to ``max_length`` keeping the start. If the cut removes the whole
response, the example stays, with every label ``-100``; :class:`BuildStats` counts such examples
(``no_target``) so the caller can warn or refuse. Note that a batch in which every label is
``-100`` gives a NaN mean loss in Hugging Face models; the training loop has to skip it.

Labels for classification
-------------------------
Integer labels are used as they are (names ``LABEL_0``, ``LABEL_1``, ... as in Hugging Face
configs). String labels are mapped by ``label_names`` when given; otherwise the sorted unique
strings get ids 0, 1, ... with one special case: when every label is ``"false"`` or ``"true"``
(BoolQ) the names are always ``["false", "true"]``, so ``false`` is 0 and ``true`` is 1 even if
a file holds only one of them. JSON booleans count as the strings ``"false"`` / ``"true"``.

What this package leaves out
----------------------------
Sequence packing, sentence-pair classification (two text fields), streaming of data that does
not fit in memory, and left padding (generation batches pad on the left; training does not need
to).
"""

from neuroada_tools.train.data.chat import ROLES, RenderedPrompt, Turns, record_turns, render_prompts
from neuroada_tools.train.data.choices import build_multiple_choice_examples, parse_arc_choices
from neuroada_tools.train.data.collate import collate
from neuroada_tools.train.data.examples import IGNORE_INDEX, BuildStats, Examples, build_causal_lm_examples
from neuroada_tools.train.data.labels import MAX_INFERRED_LABELS, build_classification_examples
from neuroada_tools.train.data.prompts import (
    FORMATS,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    TEMPLATES,
    detect_format,
    format_prompt,
)
from neuroada_tools.train.data.records import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_RECORD_BYTES,
    RecordList,
    read_records,
)

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "FORMATS",
    "IGNORE_INDEX",
    "MAX_INFERRED_LABELS",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_NO_INPUT",
    "ROLES",
    "TEMPLATES",
    "BuildStats",
    "Examples",
    "RecordList",
    "RenderedPrompt",
    "Turns",
    "build_causal_lm_examples",
    "build_classification_examples",
    "build_multiple_choice_examples",
    "collate",
    "detect_format",
    "format_prompt",
    "parse_arc_choices",
    "read_records",
    "record_turns",
    "render_prompts",
]
