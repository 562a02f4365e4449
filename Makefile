# Fresh machine:  make demo   (venv + install + train ViCo on a bundled miniature-world concept from the shipped base model, sample, score)
#                 make test   (venv + install + the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
# Where the demo writes, and extra arguments (tests/test_readme_commands.py runs the demo at tiny size with them).
LOGDIR ?= logs
DEMO_OUT ?= outputs/demo
DEMO_TRAIN_ARGS ?=
DEMO_SAMPLE_ARGS ?=

.PHONY: demo demo-sd test install clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) main.py --base configs/miniworld/base.yaml configs/miniworld/vico.yaml -t -n demo --logdir $(LOGDIR) \
		--data_root data/miniworld/sunset_ring --init_word ring $(DEMO_TRAIN_ARGS)
	$(PY) sample.py --ckpt "$$(ls -td $(LOGDIR)/*_demo | head -n 1)/checkpoints/last.ckpt" \
		--ref data/miniworld/sunset_ring/00.png --from_file configs/miniworld/demo-prompts.txt \
		--n_samples 4 --n_iter 1 --ddim_steps 50 --scale 7.5 --save_attention --outdir $(DEMO_OUT) $(DEMO_SAMPLE_ARGS)
	$(PY) scripts/score_miniworld.py $(DEMO_OUT) --concept data/miniworld/sunset_ring \
		--ckpt "$$(ls -td $(LOGDIR)/*_demo | head -n 1)/checkpoints/last.ckpt"
	@echo "demo: grids, attention pictures and metrics.md in $(DEMO_OUT)"

demo-sd: $(STAMP)
	$(PY) main.py --base configs/vico-tiny.yaml -t -n demo-sd --logdir logs
	$(PY) sample.py --ckpt "$$(ls -td logs/*_demo-sd | head -n 1)/checkpoints/last.ckpt" \
		--ref data/monster_toy/00.jpg --prompt "a photo of * on the beach" \
		--n_samples 4 --n_iter 1 --ddim_steps 20 --scale 7.5 --outdir outputs/demo-sd
	@echo "demo-sd samples (random weights: noise): outputs/demo-sd"

# Two test processes, one torch thread each (tests/conftest.py); a file's tests stay in one process,
# so module fixtures (the claim tests' trainings) are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

clean-demo:
	rm -rf $(LOGDIR)/*_demo $(LOGDIR)/*_demo-sd $(DEMO_OUT) outputs/demo-sd
