"""MoDE on Ray: Mixture of Data Experts (CLIP data experts via clustering) as Ray stages."""
