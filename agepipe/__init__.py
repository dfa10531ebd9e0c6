"""agepipe's library, below the scripts at the project's root (which it never imports): a folder per concern.

- config/   reading the YAML files and --set, and every setting's model, bounds and meaning
- data/     image files read safely, datasets and their labels, age groups, the CSV vocabulary
- quality/  the image metrics the checks test, and the duplicate search
- faces/    finding faces (BlazeFace), the pretrained face networks, the descriptor cache
- model/    the age model: backbones, Keras networks, training, reading answers, saved models
- running/  worker pools and Dask, resumable journals, atomic writes, the output guard and its manifest
- report/   the quality report's site, the model's report card, figures and HTML templates
"""
