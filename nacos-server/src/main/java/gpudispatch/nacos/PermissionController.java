package gpudispatch.nacos;

import com.alibaba.nacos.auth.annotation.Secured;
import com.alibaba.nacos.auth.common.ActionTypes;
import com.alibaba.nacos.common.model.RestResult;
import com.alibaba.nacos.common.model.RestResultUtils;
import com.alibaba.nacos.config.server.auth.PermissionInfo;
import com.alibaba.nacos.config.server.model.Page;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.web.bind.annotation.DeleteMapping;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.PostMapping;
import org.springframework.web.bind.annotation.RequestMapping;
import org.springframework.web.bind.annotation.RequestParam;
import org.springframework.web.bind.annotation.RestController;

/**
 * Nacos's permission API ({@code /nacos/v1/auth/permissions}), admins only: grant a role an action
 * ({@code r}, {@code w} or {@code rw}) on a resource pattern such as {@code public:*:naming/*}
 * ({@code POST role, resource, action}), revoke it ({@code DELETE}), list ({@code GET pageNo,
 * pageSize, role}).
 */
@RestController("gpuDispatchPermissionController")
@RequestMapping("/v1/auth/permissions")
public class PermissionController {

    @Autowired
    private UserStore store;

    @GetMapping
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "permissions", action = ActionTypes.READ)
    public Page<PermissionInfo> getPermissions(@RequestParam("pageNo") int pageNo, @RequestParam("pageSize") int pageSize,
            @RequestParam(name = "role", defaultValue = "") String role) {
        return store.permissionsPage(role, pageNo, pageSize);
    }

    @PostMapping
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "permissions", action = ActionTypes.WRITE)
    public RestResult<String> addPermission(@RequestParam("role") String role, @RequestParam("resource") String resource,
            @RequestParam("action") String action) {
        store.addPermission(role, resource, action);
        return RestResultUtils.success("add permission ok!");
    }

    @DeleteMapping
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "permissions", action = ActionTypes.WRITE)
    public RestResult<String> deletePermission(@RequestParam("role") String role, @RequestParam("resource") String resource,
            @RequestParam("action") String action) {
        store.deletePermission(role, resource, action);
        return RestResultUtils.success("delete permission ok!");
    }
}
