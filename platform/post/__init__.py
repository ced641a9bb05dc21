"""Post-training toolkit around a pretrained `HybridLM` model directory
(`mamba_slm.model.io.save_pretrained`):

- `chat`: the chat template (plain-text role markers, EOS ends an assistant turn) and
  conversation tokenization with assistant-only loss masks.
- `finetune`: LoRA supervised fine-tuning through Ray Train, adapters merged into the
  base weights at the end (`jobs/finetune.py`).
- `quantize`: weight-only INT8 / INT4 for CPU inference (`jobs/quantize.py`,
  `bench/bench_quantize.py`).
- `onnx_export`: ONNX export of the full-sequence forward, checked with onnxruntime
  (`jobs/export_onnx.py`).
- `long_context`: RoPE scaling at load time and long-document perplexity
  (`jobs/evaluate_long.py`).
- `serve`: an HTTP generation endpoint with streamed tokens (`jobs/serve.py`).
- `loading`: one loader for plain and quantized model directories plus their tokenizer.
"""
