"""The soak tier: simulated CNs push, restore and delete under a seeded fault schedule
against a real local fleet, then the fleet's promises are checked (issue 6)."""
