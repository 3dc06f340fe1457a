"""The tiny two-stage reranker chain of test_multistage.py and test_multistage_chain.py: its gin
files and bindings, shared by the config checks (parsed only) and the chains that run."""

CHAIN_FILES = ['gin/models/rankt5_encdec.gin', 'gin/sizes/tiny.gin', 'configs/runs/finetune.gin',
               'configs/runs/rerank.gin', 'configs/runs/two_stage_rerank.gin']
STEPS = {'contrastive': 6, 'distill': 20}
SAVE_EVERY = 5
BATCH_SIZE, INPUT_LENGTH, MAX_RANK = 4, 32, 8
# demo_beir's arguments (tests/conftest.py): the collection and vocabulary both files use.
DEMO_DATA = (200, 30, 256)


def bindings(model_dir, data, spm):
  """A tiny float32 encdec reranker without dropout, so a stage's first loss can be recomputed."""
  return [f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = 'beir:{data}:train'",
          f"VOCABULARY_PATH = '{spm}'", f"EVAL_BEIR = '{data}'", 'EVAL_TOP_K = 10',
          'VOCAB_SIZE = 256', 'rerankers.RerankerConfig.scoring_token_id = 100',
          f'INPUT_LENGTH = {INPUT_LENGTH}', f'BATCH_SIZE = {BATCH_SIZE}', 'LIST_SIZE = 4',
          f'MAX_RANK = {MAX_RANK}', f'CONTRASTIVE_STEPS = {STEPS["contrastive"]}',
          f'DISTILL_STEPS = {STEPS["distill"]}', 'CONTRASTIVE_LEARNING_RATE = 1e-2',
          'DISTILL_LEARNING_RATE = 1e-2', 'DROPOUT_RATE = 0.0', "ACTIVATION_DTYPE = 'float32'",
          'trainer.TrainerConfig.log_every = 1', f'trainer.TrainerConfig.save_every = {SAVE_EVERY}',
          'trainer.TrainerConfig.progress_bar = False', 'trainer.TrainerConfig.tensorboard = False']
