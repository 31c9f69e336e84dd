"""megacca: pretraining and alignment (CCA, DPO) of unified text + image-token autoregressive transformers."""
__version__ = "0.1.0"
