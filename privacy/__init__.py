"""Everything privacy: a client's policy and its account (the one door a client spends privacy
through), accounting with Opacus, OS-seeded randomness, signed hash-chained ledgers and their
independent verification, the compliance report and the membership-inference audit."""
