"""The tiny T5 that test_plan.py (the planner's arithmetic and search) and test_plan_compile.py
(steps compiled for their memory analysis) plan for."""

from t5dual import t5

TINY = t5.T5Config(vocab_size=128, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                   num_layers=2, relative_attention_num_buckets=8, dtype='float32')
