"""ResRep (Ding et al., ICCV 2021): the reference pruning plugin of mslim."""
