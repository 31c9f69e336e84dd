"""megacca: pretraining and alignment (CCA, DPO) of unified text + image-token autoregressive transformers.

`megacca.load(path)` loads a checkpoint for inference (`megacca.inference`); it is imported on first use, so
`import megacca` stays free of torch and megatron-core.
"""
__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
    if name == "load":
        from megacca.inference import load

        return load
    raise AttributeError(f"module 'megacca' has no attribute {name!r}")
