"""The chat page's files (package data: index.html and what it loads), served by
``llmserve.server.routes.webui``. Plain HTML, CSS and JavaScript: no build step, nothing
fetched from elsewhere."""
