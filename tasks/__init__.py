"""SeqIO task and mixture registrations (KILT and the demo world), on import."""
