"""Independent correctness oracles for RWKV-7 GGUF files (never import rwkv_jax here).

- `official`: BlinkDL's `rwkv` pip package ("cpu fp32") fed with the GGUF weights converted back
  to the original `.pth` layout (inverse of llama.cpp's converter).
- `numpy_ref`: a float64 numpy re-statement of the spec's §1.4, token by token, reading the GGUF
  directly; use it for quantized files ("f32 engine vs f64 math on the same dequantized weights").
- `tiny_gguf`: writes small random RWKV-7 GGUF files in the exact llama.cpp layout for tests.
"""
