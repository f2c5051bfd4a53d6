"""Plain sequential fine-tuning: the lower bound every continual-learning method is measured against.

Nothing is added to the loss and nothing is kept between tasks; what trains (all of the language model,
the projector, or LoRA adapters) is the recipe's ``model`` section. An empty ``methods:`` list means this.

    methods: [finetune]
"""

from lvlm_cl.methods.base import Method


class Finetune(Method):
    name = "finetune"
