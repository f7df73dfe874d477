"""Edge model caching: a catalogue of models as content-addressed blocks (bases, LoRA adapters, partial
fine-tunes), edge block stores, placement policies, a seeded workload, and replay with analytic delivery."""
