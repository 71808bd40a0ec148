"""LoRA fine-tuning of the student: data.py (messages → tokens + assistant masks), attention.py (padding-free
attention), train.py (the `finetune` stage), merge.py (adapter + base → one model), launch.py (torchrun)."""
