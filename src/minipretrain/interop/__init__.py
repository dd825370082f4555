"""Weights in and out of minipretrain.

    hf.py        export to a Hugging Face `transformers` directory (Llama, Qwen3, Qwen3-MoE, Mixtral layouts, no
                 custom code) and import such a directory back
    minimind.py  import the fp16 `.pth` state dicts MiniMind's own trainer writes

Our parameter names already follow Hugging Face's Llama / Qwen layout, so both directions are renames plus a config
translation; every shape is checked against the config before anything is written.
"""
