"""Human and AI feedback: reviewers rank sampled responses in a browser (server.py, page.html), reward
functions rank them unattended (ai.py), every judgment is kept in SQLite (store.py), and the export
(export.py) turns them into preference pairs and conversations that the `feedback` data source feeds
to a next round's data stage."""
