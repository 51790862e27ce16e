"""The one test harness: processes by pid, QMP sessions, the replication pair, the models,
the reference tools and the TLS PKI. What demo and bench need too lives in blockrep.testing.
"""
