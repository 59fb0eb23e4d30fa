"""rwkv_jax: RWKV-7 inference in JAX from llama.cpp GGUF files.

    model = rwkv_jax.load("model.gguf")
    logits, state = model.forward(model.tokenizer.encode("Hello"))
    print(model.generate("The capital of France is", max_tokens=16))

The pure functions (`rwkv_jax.model.forward`, `rwkv_jax.generate.prefill_call`,
`rwkv_jax.generate.decode_step`) take the params and state pytrees explicitly.
"""

from rwkv_jax.errors import (
    ConfigError,
    GGUFError,
    InputError,
    RwkvJaxError,
    StateError,
    UnsupportedTypeError,
)
from rwkv_jax.generate import Model, decode_step, from_gguf, load, prefill_call
from rwkv_jax.gguf import GGUFFile, ModelConfig
from rwkv_jax.model import forward
from rwkv_jax.params import Params, load_params
from rwkv_jax.state import State

__all__ = [
    "ConfigError",
    "GGUFError",
    "InputError",
    "RwkvJaxError",
    "StateError",
    "UnsupportedTypeError",
    "Model",
    "decode_step",
    "from_gguf",
    "load",
    "prefill_call",
    "GGUFFile",
    "ModelConfig",
    "forward",
    "Params",
    "load_params",
    "State",
]
__version__ = "0.1.0"
