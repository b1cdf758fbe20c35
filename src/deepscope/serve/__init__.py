"""`deepscope serve`: interactive labelling in the browser with live random-forest pixel classification."""
