# One rule per stage of the stage table (src/progan/pipeline/ STAGES): its inputs (data and the source files it
# runs), outputs, params values, `gpu` resource and command all come from there. Rules are made in a function, one
# call per stage, so that each rule's shell and input functions see their own stage (a loop variable would not be).


def define_rule(stage):
    rule:
        name: stage.rule
        input: unpack(stage_inputs(stage))
        output: stage_outputs(stage)
        params: values=stage_params(stage)
        resources: **stage_resources(stage)
        wildcard_constraints: res=r"\d+"
        log: stage_log(stage)
        shell: stage_shell(stage)


for _stage in pipeline.STAGES.values():
    define_rule(_stage)
