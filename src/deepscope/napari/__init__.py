"""The napari plugin (``pip install 'deepscope[napari]'``): a reader for deepscope's outputs and widgets that run a
model on the open image and show a run's report. Declared in ``napari.yaml`` (npe2); nothing here is imported unless
napari asks for it."""
