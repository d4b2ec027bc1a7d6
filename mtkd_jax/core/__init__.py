"""The functional core: pure functions over arrays, teacher axis first (`[K, ..., C]`).

Nothing here knows about models, optimizers or devices:

* `divergence`: tempered softmax and the pairwise divergence between teachers;
* `losses`: per-example soft losses (`soft_kl`, `soft_mse`), cross-entropy, their mix and
  its masked batch mean;
* `reduce`: masked sums and means, across devices when an axis name is given;
* `class_sets`: teachers that know different classes, in one global class space;
* `precision`: the mixed-precision `Policy` and float helpers;
* `checks`: the argument checks every layer uses (ValueError/TypeError naming the argument).
"""
