# Two commands do everything: `make pipeline` runs every stage on the built-in sample dataset,
# `make test` runs the test suite. Both create .venv and install requirements.txt when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
# A worker per core; each test file runs in one worker, so its fixtures are built once.
PYTEST := $(PY) -m pytest -n auto --dist loadfile
REAL_DATA := ../shared/data/utkface_sample

.PHONY: pipeline test test-slow smoke-real bench lab

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m ipykernel install --sys-prefix --name agepipe --display-name "agepipe (.venv)" > /dev/null
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# The notebooks in JupyterLab, in the workspace of `make pipeline WORKSPACE=...` (default: the project folder)
lab: $(STAMP)
	AGEPIPE_WORKSPACE=$(WORKSPACE) $(VENV)/bin/jupyter lab

# Your own data: make pipeline DATA=~/photos LABELS=~/photos/labels.csv WORKSPACE=~/agepipe-run
# (DATA alone reads ages from UTKFace names; without WORKSPACE everything goes into the project folder).
WORKSPACE_SET := $(if $(WORKSPACE),--set workspace=$(WORKSPACE),)
DATA_SET := $(if $(DATA),--set dataset_dir=$(DATA),) $(if $(LABELS),--set labels.csv_path=$(LABELS),)

pipeline: $(STAMP)
	$(if $(DATA),,$(PY) make_sample_dataset.py $(WORKSPACE_SET))
	$(PY) explore_images.py $(WORKSPACE_SET) $(DATA_SET)
	$(PY) process_images.py $(WORKSPACE_SET)
	$(PY) check_labels.py $(WORKSPACE_SET)
	$(PY) visualize_image_information.py $(WORKSPACE_SET)
	$(PY) run_notebook.py australian_population.ipynb $(WORKSPACE_SET)
	$(PY) run_notebook.py resampling.ipynb $(WORKSPACE_SET)
	$(PY) train_model.py $(WORKSPACE_SET)
	$(PY) predict_age.py $(WORKSPACE_SET)

test: $(STAMP)
	$(PYTEST) -m "not slow"

# The long end-to-end and real-data tests (marked slow); CI runs them after `make test`.
test-slow: $(STAMP)
	$(PYTEST) -m slow

# Optional: explore, process and train on real UTKFace faces, when ../shared/data is present
# (trained on the checked set, its natural mix: no resampling; tested on a held-out 15% of them).
# Everything goes to the workspace real_data/.
smoke-real: $(STAMP)
	@if [ -d $(REAL_DATA) ]; then \
		$(PY) explore_images.py --set workspace=real_data --set dataset_dir=$(REAL_DATA) && \
		$(PY) process_images.py --set workspace=real_data && \
		$(PY) check_labels.py --set workspace=real_data && \
		$(PY) train_model.py --set workspace=real_data --set input_csv=real_data/csv/checked_metadata.csv; \
	else echo "skipping real-data smoke run: $(REAL_DATA) not found"; fi

bench: $(STAMP)
	$(PY) benchmarks/bench_explore.py $(REAL_DATA)
	$(PY) benchmarks/bench_faces.py $(REAL_DATA)
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_process.py $(REAL_DATA)
	$(PY) benchmarks/bench_model.py $(REAL_DATA)
	$(PY) benchmarks/bench_photos.py $(REAL_DATA)
	$(PY) benchmarks/bench_labels.py $(REAL_DATA)
	$(PY) benchmarks/bench_predict.py $(REAL_DATA)
