"""medimg's clients for a running Triton server: :mod:`.contract` (the request contract and
request builders), :mod:`.session` (connect and retry, shared by both clients),
:mod:`.sync` and :mod:`.aio` (the clients), :mod:`.inputs` (what is sent), :mod:`.shm`
(shared memory), :mod:`.commands` (what ``medimg classify/label/triage`` run)::

    python -c "from serving.clients.sync import TritonClassifier; help(TritonClassifier)"
"""
