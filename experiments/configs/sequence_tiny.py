"""A seconds-long run of the sequence experiment, for the test suite
(tests/test_sequence_experiment.py).

Command:
    python experiments/sequence.py --config experiments/configs/sequence_tiny.py

Expected: every output (results.md, results.json, the two PNGs, TensorBoard events) in
seconds; the models are far too small and short-trained for the numbers to mean anything.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "sequence_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sequence.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_full = _module.get_config


def get_config():
    c = _full()
    c.output_dir = "runs/sequence_tiny"
    c.seeds = 1
    c.teacher_epochs = 1
    c.student_epochs = 1
    c.batch_size = 16
    c.weightings = ("entropy",)
    c.data.update(dict(vocab_size=12, max_len=8, min_len=3, num_train=32, num_val=16,
                       num_test=16))
    c.teachers.update(dict(dims=(8, 6), depths=(1, 1), contexts=(2, 2)))
    c.student.update(dict(dim=4, depth=1, context=2))
    c.chunk_size = 4
    c.cache_top_k = 4
    return c
