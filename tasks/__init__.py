"""seqio Task and Mixture registrations for moejax (installed as ``moejax.tasks``).

Importing this package registers the tasks. The embedded corpus and its tasks arrive with the
trainer (issue 4); this package currently registers nothing.
"""
