"""Ray actors: student rollout engines and the teacher-scoring pool, over engine backends."""
