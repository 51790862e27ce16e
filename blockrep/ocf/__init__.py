"""The OCF resource agent ``ocf:blockrep:blockrep``: blockrep under Pacemaker.

``codes`` (the OCF exit codes), ``scores`` (status → promotion score and monitor's exit,
pure), ``metadata`` (the agent's XML), ``fence`` (crm-fence-peer's constraint: the XML
and the peer's membership verdict are pure; placing and removing it runs ``cibadmin``),
``agent`` (the actions) and ``install`` (the ``#!/bin/sh`` wrapper Pacemaker runs).
"""
