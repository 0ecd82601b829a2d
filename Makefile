# The two commands of the README: `make demo` and `make test`. Both install into .venv when needed.
#   make install   create .venv (python3 -m venv) and pip-install requirements.txt (once; redone when it changes)
#   make test      the default test suite (slow tests: .venv/bin/python -m pytest -m slow)
#   make demo      convert the real TerraMesh sample, pretrain cfgs/pretrain/demo.yaml, then fine-tune
#                  (DATA=folder of GeoTIFF sub-folders and SPEC=its converter spec to use another sample;
#                  DEMO=output/<name> keeps its runs apart from an earlier demo's)
#   make compare   the four pretraining recipes on every real scene, the same probes for each (cfgs/compare/demo.yaml)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/terramesh_examples
SPEC   ?= cfgs/data/terramesh_examples.yaml
DEMO   ?= output/demo
DEMO_DATA := $(DEMO)/data/terramesh64
# One intra-op thread per process for the demo: on 2 shared cores, 2 OpenMP threads that spin-wait
# for each other ran 2-3x slower than 1 whenever anything else was running (measured).
DEMO_THREADS ?= 1

.PHONY: install test demo clean-demo compare

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch, torchvision and timm in one resolve, so pip picks a matching torch / torchvision pair
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

$(DEMO_DATA)/terramesh64.h5: | $(STAMP)
	$(PY) tools/geotiff_to_mmearth.py --spec $(SPEC) --src $(DATA) \
		--out $(DEMO_DATA) --tile-size 64

demo: $(STAMP) $(DEMO_DATA)/terramesh64.h5
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) run_pretraining.py --config cfgs/pretrain/demo.yaml data_path=$(DEMO_DATA) output_dir=$(DEMO)/pretrain
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) run_finetuning.py --config cfgs/finetune/demo.yaml data_path=$(DEMO_DATA) \
		finetune.checkpoint=$(DEMO)/pretrain/checkpoint-last.pth output_dir=$(DEMO)/finetune
	@echo ""
	@echo "Demo outputs:"
	@echo "  converted data        $(DEMO_DATA)/"
	@echo "  pretraining log       $(DEMO)/pretrain/log.jsonl"
	@echo "  pretraining config    $(DEMO)/pretrain/config.yaml"
	@echo "  checkpoint            $(DEMO)/pretrain/checkpoint-last.pth"
	@echo "  reconstructions       $(DEMO)/pretrain/reconstructions/"
	@echo "  fine-tuning grid      $(DEMO)/finetune/results.json"

clean-demo:
	rm -rf $(DEMO)

compare: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) benchmarks/compare_objectives.py --config cfgs/compare/demo.yaml
