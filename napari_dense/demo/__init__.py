"""The demo: patch classifiers trained on scikit-image's immunohistochemistry image."""
