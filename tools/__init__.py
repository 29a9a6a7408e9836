"""Developer tools: builders for the artefacts the server and the tests need."""
