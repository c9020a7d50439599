"""Needle in a haystack with a tiny Llama trained at 512 tokens: the package's demo.

Modules: :mod:`.data` (the key-value recall task: prompts and training batches),
:mod:`.model` (the shipped model and the methods it runs with), :mod:`.evaluate` (accuracy,
table, heatmap, selection probe), :mod:`.cli` (``python -m reattention``). Nothing here
imports transformers until it is used.
"""
from .cli import default_lengths, main
from .data import (BOS, FIRST_CONTENT, KEY, KEY_LEN, MIN_LENGTH, NEEDLE_LEN, PAD, QUERY,
                   QUESTION_LEN, TRAINED_LENGTH, VAL, VALUE_LEN, VOCAB_SIZE, make_batch,
                   make_sample)
from .evaluate import evaluate, format_table, plot_heatmap, selection_recall, summary
from .model import (CPU_DEMO_METHODS, METHOD_DESCRIPTIONS, METHOD_TITLES, METHODS,
                    NEEDLE_SETTINGS, PREFILL_CHUNK, answer, load_model, method_config,
                    model_config, use_method)

__all__ = [
    "make_sample", "make_batch", "model_config", "load_model", "method_config", "use_method",
    "answer", "evaluate", "selection_recall", "format_table", "plot_heatmap", "summary",
    "default_lengths", "main", "METHODS", "METHOD_TITLES", "METHOD_DESCRIPTIONS",
    "CPU_DEMO_METHODS",
    "NEEDLE_SETTINGS", "PREFILL_CHUNK", "TRAINED_LENGTH", "MIN_LENGTH", "VOCAB_SIZE", "PAD",
    "BOS", "KEY", "VAL", "QUERY", "FIRST_CONTENT", "KEY_LEN", "VALUE_LEN", "NEEDLE_LEN",
    "QUESTION_LEN",
]
