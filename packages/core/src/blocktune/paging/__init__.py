"""Units in memory under byte budgets: the pager, how a unit comes in, device slots, host tier, write-back."""
