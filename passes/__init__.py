"""Graph-rewrite passes that swap matmul/collective subgraphs for fcpass ops.

The pattern families arrive with issue 2/6; this package already ships so
the distribution layout is final.
"""
