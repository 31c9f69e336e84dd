"""Evaluation of generated samples and of held-out likelihood (README, "Evaluation").

- `judge`: the digits judge (RBF SVC on the real training digits) and the real digits of a shard split;
- `metrics`: decoded images → the digits' 0..16 pixels, accuracy / Fréchet distance / diversity, caption
  accuracy, the reference figures of real digits;
- `heldout`: the mean per-token NLL of a model on a shard split, in the training loader's layout;
- `adm`: sample batches for the ADM evaluation suite, FID / IS in-process when Inception weights are local;
- `cli`: `megacca eval` and the evaluation functions it runs; `sweep`: `megacca sweep`.

Submodules are imported on use: `import megacca.evaluation` alone loads nothing heavy.
"""
