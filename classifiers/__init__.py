"""Forget-target prompt classification (lexical, semantic, learned stages). Built by the classifier issue."""
