"""Jobs: what each job kind takes, where jobs are stored, how a worker runs them, and one module per kind.

- ``params``: the parameters of each kind (torch-free: the gateway validates requests with them);
- ``store``: the queries behind the jobs API, the checks made before queueing, a job's files;
- ``runner``: the envelope a job runs in (claim, run, record the outcome) and its progress reporter;
- ``workers``: worker heartbeats and re-queueing the jobs of a worker that stopped;
- ``pretrain``, ``finetune``, ``evaluate``: the job kinds; ``labelled`` (a labelled dataset's splits and
  record features) and ``downstream`` (protocols and training helpers) serve fine-tuning and evaluation.
"""
