"""One exception family: every user-facing failure says what, where and how to fix it."""


class RwkvJaxError(Exception):
    """Base class of every error rwkv_jax raises on bad input (file, config, state, prompt)."""


class GGUFError(RwkvJaxError):
    """A GGUF file is malformed, truncated, inconsistent, or uses something we do not support."""


class UnsupportedTypeError(GGUFError):
    """A tensor uses a ggml type rwkv_jax cannot unpack (IQ*, TQ*, MXFP4, ...)."""


class ConfigError(RwkvJaxError):
    """An experiment config (YAML or key=value override) is invalid; the message names the key."""


class StateError(RwkvJaxError):
    """A recurrent-state file or object does not fit the model it is given to."""


class InputError(RwkvJaxError):
    """A prompt, token id or argument is out of range."""
