"""The graph pass: recognise sites, decide, rewrite. ``fold.AffineFoldPass`` drives it."""
