"""Reports: the quality report's site (quality_site.py), the model's report card (model_card.py), figures
(figures.py) and the HTML pages (pages.py, templates/)."""
