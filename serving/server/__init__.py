"""The tritonserver process: its options (:mod:`.config`), the embedded server home
(:mod:`.home`), ports and addresses (:mod:`.network`), the process (:mod:`.process`), what it
leaves in /dev/shm (:mod:`.cleanup`), the HTTP guard in front of it (:mod:`.http_guard`,
:mod:`.request_rules`) and the repository token (:mod:`.token`)."""
