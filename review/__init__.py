"""The morning review page (``neuron review``): a server-rendered worklist of screened studies, a study page with the
heatmaps and provenance of every finding and a verdict form per finding, and a summary page. Starlette + Jinja2, no
JavaScript build; all SQL lives in ``db.review``."""
